"""Launchers (installed as ``ssltrain.launch``): Slurm through submitit with requeue (:mod:`.slurm`), torchrun
(:mod:`.local`), and the ``ssltrain launch`` subcommand (:mod:`.cli`). See launch/README.md."""
