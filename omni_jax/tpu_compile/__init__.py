"""Ahead-of-time compiles for a TPU slice on any host (`omni-jax compile`): will a config fit before renting it?

libtpu describes a slice by name ("v6e:4x4") as compile-only devices; the real sharded program of a job (train
step, prefill, decode) is traced from abstract shapes (no weights are materialised) and compiled for them. The
compiler's memory analysis gives per-chip memory, its HLO the Mosaic kernels and collectives.

    topology.py   slice name -> devices, HBM per chip, the (data, fsdp, tensor) mesh
    programs.py   the abstract, sharded program of each job
    hlo.py        Mosaic kernels, custom calls and collectives of the compiled HLO
    report.py     per-chip memory, fits, JSON and the printed table
    command.py    the subcommand: flags and YAMLs -> report, exit codes
"""
