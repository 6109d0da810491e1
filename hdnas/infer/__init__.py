"""How a derived network runs: the one place that chooses its execution (plain modules, native depthwise, fused oneDNN), tiling and the receptive field."""

# derived networks run their depthwise convs natively on CPU ("auto"): load the kernels' module,
# which plugs itself into the model's ops
from hdnas.mixed import native as _native  # noqa: E402,F401
