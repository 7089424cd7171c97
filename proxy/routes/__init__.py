"""HTTP routes: the gated APIs and the verbatim pass-through for everything else."""
