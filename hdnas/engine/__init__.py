"""The run engine shared by search and train, one module per concept: ``config`` (the shared
settings and their flags), ``schema`` (versions of the run files), ``errors``, ``runtime``
(device, mixed precision, step timer), ``rundir`` (the run folder, config.json, log),
``history`` (history.csv), ``loop`` (the step loop), ``search`` and ``train`` (the two loops),
``cli`` (the command line: new run, resume, torchrun), ``distributed``, ``allocator``,
``threads`` (a thread count that follows the free CPUs), ``plots`` (the run's pictures),
``drawing`` (a derived network), ``tensorboard`` (``--tensorboard``)."""
