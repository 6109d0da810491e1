"""Test setup. TRITON_INTERPRET must be set before any Triton kernel module is imported (the
check happens at decoration time), so it is set here, at collection, when there is no GPU.

Two tiers: ``python -m pytest -q`` runs the fast one (pyproject.toml's addopts deselect the
``slow`` marker); ``python -m pytest -q -m slow`` the slow one (.ci/run runs both). What is slow
is listed in ``SLOW`` below (and marked ``@pytest.mark.slow`` in a few test files)."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The merged dense conv's route is otherwise chosen per shape by timing (hdnas.mixed.dense), so
# which route a test ran would depend on the machine and its load. The suite pins the direct
# route, whose round-off the conformance bounds hold elementwise; tests/mixed/test_dense.py tests
# the FFT route (norm-wise bound) and the timed choice on their own.
os.environ.setdefault("HDNAS_DENSE_CONV", "direct")
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass


import pytest  # noqa: E402

#: The slow tier, by node-id prefix (relative to the repository root) -> why it is slow on a
#: 2-core AVX2 machine (times measured there, under load). Each kind keeps a quick representative
#: in the fast tier where it has one (named in the comment). A prefix naming a file or a test
#: function that does not exist is an error (pytest_collection_modifyitems).
SLOW = {
    # the wheel: builds it, a fresh venv and the native library just in time (0.5 to 3 min)
    "tests/packaging/test_wheel.py": "wheel + venv + JIT C++ build",
    # host CUDA under sanitizers: the ASan/UBSan build of the kernels and the emulation, then
    # every tap table and thread schedule (minutes at a cold cache). Fast representatives: the
    # -O2 library against the PyTorch reference (test_cuda_host.py), the build key and the
    # compile-error report (test_cuda_host_emulation.py)
    "tests/csrc/test_cuda_host.py::test_kernels_under_sanitizers": "ASan/UBSan kernels",
    "tests/csrc/test_cuda_host_emulation.py::test_self_test_list_is_complete": "ASan build",
    "tests/csrc/test_cuda_host_emulation.py::test_emulation": "ASan/UBSan self-tests",
    "tests/csrc/test_cuda_host_emulation.py::test_asan_catches_a_shared_memory_overflow":
        "ASan build",
    # nvcc for sm_90 and the binding against torch's CUDA headers (4 to 16 s each). Fast
    # representative: test_header_is_torch_free
    "tests/csrc/test_cuda_compile.py::test_cuda_kernels_compile_sm90": "nvcc",
    "tests/csrc/test_cuda_compile.py::test_binding_compiles_against_torch_cuda_headers":
        "C++ parse of the torch CUDA headers",
    # Triton AOT compilation for sm_90 (2.5 min). Fast: the matrix and launch-site tests
    "tests/kernels/test_triton_aot.py::test_aot_sm90_search_configs": "Triton AOT compile",
    # torchrun: two-process runs (25 to 50 s each). Fast: the single-process collectives, the
    # per-rank data slices, the refused odd batch
    "tests/engine/test_distributed.py::test_two_process_search_equals_one_process": "torchrun",
    "tests/engine/test_distributed.py::test_two_process_darts2_equals_one_process": "torchrun",
    "tests/engine/test_distributed.py::test_two_process_retraining_equals_one_process": "torchrun",
    "tests/engine/test_distributed.py::test_resume_of_a_two_process_run_on_two_or_one_processes":
        "torchrun",
    "tests/engine/test_distributed.py::test_debug_sync_finds_ranks_out_of_sync": "torchrun",
    "tests/engine/test_distributed.py::test_a_hung_rank_ends_the_job_with_a_clear_message":
        "torchrun",
    # per-ISA fresh processes (HDNAS_NATIVE_ISA). Fast: every variant in-process (set_isa)
    "tests/csrc/test_native_isa.py::test_env_var_forces_a_variant": "subprocess per ISA",
    "tests/csrc/test_native_isa.py::test_env_var_refused_with_a_clear_error": "subprocess",
    # fuzz cases of the Triton backend in the interpreter, all but case 0 (the fast
    # representative): every other index starts with a digit 1 to 9
    **{f"tests/mixed/test_fuzz.py::test_fuzz[cpu-triton-{d}": "Triton interpreter"
       for d in range(1, 10)},
    # a whole supernet's search steps in the Triton interpreter (25 s). Fast: the other
    # conformance tests of the Triton backend
    "tests/mixed/test_conformance.py::test_supernet_search_steps[triton]": "Triton interpreter",
    # the Triton backend in the interpreter (2 to 8 s per case) on the DLSR-sized op sets and
    # shapes of the conformance suite. Fast: its small op sets (conv1_dil, conv_sep, dil_skip,
    # sep_only, dense_only) in fp64, their distillation steps in fp32 and fp64, fp16 autocast of
    # conv1_dil, bad inputs, fuse_concat
    **{f"tests/mixed/test_conformance.py::{t}": "Triton interpreter" for t in (
        "test_op_sets_fp64[dlsr-triton-cpu]", "test_op_sets_fp64[dlsr_skip-triton-cpu]",
        "test_op_sets_fp64[no_dense-triton-cpu]",
        "test_distill_step[dtype0-dlsr-triton-cpu]",
        "test_distill_step[dtype0-no_dense-triton-cpu]",
        "test_distill_step[dtype1-dlsr-triton-cpu]",
        "test_distill_step[dtype1-no_dense-triton-cpu]",
        "test_autocast[1-dlsr-triton-cpu]", "test_autocast[1-dlsr_skip-triton-cpu]",
        "test_noncontiguous[dtype0-channel_slice-triton-cpu]",
        "test_noncontiguous[dtype0-transposed-triton-cpu]",
        "test_noncontiguous[dtype1-channel_slice-triton-cpu]",
        "test_noncontiguous[dtype1-transposed-triton-cpu]",
        "test_weight_kinds_fp32[onehot-triton-cpu]", "test_weight_kinds_fp32[raw-triton-cpu]",
        "test_weight_kinds_fp32[sigmoid-triton-cpu]", "test_weight_kinds_fp32[softmax-triton-cpu]",
        "test_odd_shapes_fp64[shape0-triton-cpu]", "test_odd_shapes_fp64[shape1-triton-cpu]",
        "test_odd_shapes_fp64[shape2-triton-cpu]", "test_odd_shapes_fp64[shape3-triton-cpu]",
        "test_distill_step_noncontiguous[channel_slice-triton]",
        "test_distill_step_noncontiguous[transposed-triton]",
        "test_distill_step_odd_channels[triton]", "test_half_precision[dtype0-triton-cpu]")},
    # Triton interpreter on many blocks (11 to 15 s each), torch.compile of the whole Triton
    # backend (12 s), the biggest grouped_dw cases in fp32. Fast: the other Triton primitive
    # tests, test_triton_torch_compile
    "tests/mixed/test_primitives.py::test_triton_dw_many_blocks": "Triton interpreter",
    "tests/mixed/test_primitives.py::test_triton_backend_torch_compile": "Triton + compile",
    "tests/mixed/test_primitives.py::test_grouped_dw[dtype1-0-triton-cpu]": "Triton interpreter",
    "tests/mixed/test_primitives.py::test_grouped_dw[dtype1-1-triton-cpu]": "Triton interpreter",
    # whole DARTS searches, patched and original, compared (10 to 20 s each). Fast: one step of
    # a network against the original (test_same_loss_and_gradients[gdas-fp64]), the DARTS
    # contract tests (tests/darts/test_darts_contract.py)
    "tests/darts/test_darts_network.py::test_search_gives_same_alphas_and_genotype":
        "two DARTS searches",
    # a DARTS network against the original (4 to 6 s each). Fast: [gdas-fp64]
    **{f"tests/darts/test_darts_network.py::test_same_loss_and_gradients[{p}]": "DARTS network"
       for p in ("softmax-fp32", "softmax-fp64", "pcdarts-fp32", "pcdarts-fp64", "sigmoid-fp64")},
    # tiny searches (5 to 13 s per test). Fast: the other search command tests (killed and
    # resumed [joint-off], test_retrain_and_resume, test_few_steps_on_embedded_data...)
    "tests/commands/test_search_cli.py::test_killed_and_resumed_equals_uninterrupted[joint-fp16]":
        "search killed and resumed, fp16",
    "tests/commands/test_search_cli.py::test_paper_preset_has_no_working_penalty_like_the_release":
        "two searches",
    "tests/commands/test_search_cli.py::test_passive_openmp_with_threads_is_warned_about":
        "two searches",
    "tests/commands/test_search_cli.py::test_resume_cli": "a search, resumed twice",
    "tests/commands/test_search_cli.py::test_pictures_without_validation_have_no_val_png":
        "a search and its pictures",
    # the whole dry run of python -m bench.gpu on the CPU (15 to 28 s). Fast: the bench.gpu
    # tests of a broken backend, the sanitizer step, the plans, the replay of bench/fuzz.py
    "tests/bench/test_bench_gpu.py::test_dry_run_all_sections": "bench.gpu dry run",
    # Trimmed for the fast tier's time on a 2-core box (each 5-8 s; representatives stay fast):
    # TensorBoard (an optional dependency) writes through a whole tiny search twice (the
    # plots and schema tests keep a tiny search in the fast tier); the interpreter runs every
    # Triton launch of a search to compare with the AOT matrix (the matrix's own checks stay);
    # retraining + resume (test_killed_and_resumed_equals_uninterrupted stays)
    "tests/engine/test_tensorboard.py": "two tiny runs with an optional dependency",
    "tests/kernels/test_triton_aot.py::test_launches_are_in_the_matrix": "Triton interpreter",
    "tests/commands/test_search_cli.py::test_retrain_and_resume": "a retraining resumed",
    # bench.bench_darts end to end: four fresh processes of toy DARTS steps (~30 s). Fast: the
    # order of its configurations (test_configs_alternate_original_and_swapped)
    "tests/bench/test_bench_darts.py::test_tiny_run_writes_a_table": "four benchmark processes",
    # torch.compile (aot_eager: Dynamo + AOTAutograd) of tiny searches against eager ones, each
    # rule (10 to 11 s each). Fast: the same test with Dynamo alone and one op
    # ([joint-eager]), the one-graph tests of the supernet's forward
    **{f"tests/engine/test_compile.py::test_compiled_search_equals_eager[{p}]":
       "aot_eager compiles of searches" for p in ("joint-aot_eager-native",
                                                  "darts1-aot_eager-merged",
                                                  "darts2-aot_eager-native")},
    # subprocesses and repeated runs whose behaviour has a quick in-process twin (2026-12-07: the
    # fast tier reached 5.5-5.9 min of its 6 on the 2-core AVX2 box)
    "tests/engine/test_allocator.py::test_tuned_heap_reuses_freed_pages":
        "child processes measuring page reuse (8 s). Fast: test_opt_out_is_reported",
    "tests/bench/test_bench_fuzz.py::test_printed_replay_command_runs":
        "replays in a child process (5 s). Fast: tests/mixed/test_fuzz.py::test_replay_command_line",
    "tests/mixed/test_fuzz.py::test_cases_are_reproducible":
        "draws the case list twice (5 s). Fast: test_ci_cases_cover_the_space",
    "tests/bench/test_bench_gpu.py::test_sanitizer_runs_the_case":
        "sanitizer run of a case (5 s). Fast: test_sanitizer_error_fails",
    "tests/commands/test_evaluate.py::test_help_runs":
        "--help in a child process (4.5 s). Fast: the in-process CLI tests of that file",
    "tests/engine/test_compile.py::test_native_dense_conv_routes_are_one_graph":
        "Dynamo traces per dense route (3 x 3.6 s). Fast: test_supernet_forward_is_one_graph",
}


def pytest_collection_modifyitems(config, items):
    """Marks the tests of ``SLOW`` slow (before -m deselects them). A prefix naming a missing
    file, or a test function that its (collected) file does not define, is an error: a moved or
    renamed test must not drop out of the slow tier into the fast one unnoticed."""
    modules = {}
    for item in items:
        for prefix in SLOW:
            if item.nodeid.startswith(prefix):
                item.add_marker(pytest.mark.slow)
        if getattr(item, "module", None) is not None:
            modules.setdefault(item.nodeid.split("::")[0], item.module)
    stale = []
    for prefix in SLOW:
        path, _, name = prefix.partition("::")
        name = name.split("[")[0].split("::")[0]
        if not (config.rootpath / path).exists() or (
                name and path in modules and not hasattr(modules[path], name)):
            stale.append(prefix)
    if stale:
        raise pytest.UsageError(f"tests/conftest.py SLOW names tests that do not exist: {stale}")


@pytest.fixture(scope="session")
def shared_dir():
    """The shared data directory (hdnas.testing.shared.shared_dir: $HDNAS_SHARED, else
    ../shared next to the repository); it may not exist."""
    from hdnas.testing.shared import shared_dir as find

    return find()


@pytest.fixture(autouse=True)
def _no_tf32():
    """On a GPU, fp32 convs and GEMMs default to TF32 (cuDNN): the tests compare in real fp32."""
    import torch

    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(scope="session", autouse=True)
def _cpu_cache_for_the_session():
    """The whole session runs under hdnas' caching CPU allocator (what ``hdnas.darts.patch``
    installs), from its first test rather than from whichever test first patches a model: every
    test then also exercises the allocator, in the same state whatever order they run in
    (``HDNAS_CPU_CACHE=0`` runs the session on the default allocator)."""
    from hdnas.mixed import cpu_cache

    cpu_cache.enable()
    yield


@pytest.fixture(scope="session")
def nat():
    """hdnas.mixed.native with its CPU kernels loaded; skip (fail under HDNAS_REQUIRE_NATIVE=1)
    when they are unavailable."""
    from hdnas import native_build
    from hdnas.mixed import native

    if not native.available("cpu"):
        msg = f"native CPU kernels unavailable: {native_build.error('cpu')}"
        if os.environ.get("HDNAS_REQUIRE_NATIVE") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return native


@pytest.fixture(autouse=True)
def _fresh_hdnas_logger():
    """A run sets up the "hdnas" logger (file handler, no propagation, level INFO); undo that
    after each test so that the next one's caplog sees the package's records whatever ran
    before it."""
    import logging

    log = logging.getLogger("hdnas")
    state = (log.level, log.propagate, list(log.handlers))
    yield
    for h in list(log.handlers):
        if h not in state[2]:
            log.removeHandler(h)
            h.close()
    log.setLevel(state[0])
    log.propagate = state[1]
