"""The run engine shared by search and train: configs, run folder, history, the loop, resume, distributed, allocator."""
