"""The gin layer: everything a config file can name, and the runs the tools start.

``registry`` (the mechanism) and ``configurables`` (every core name a config can use, registered
in one place); ``config`` (parsing, the operative config, building systems, data sets and flows);
``runs`` (train, evaluate, sample, check a solver), ``finetune``, ``compare``, and the data
generators ``generate`` (particle systems, by MCMC) and ``generate_ad2`` (alanine dipeptide, by MD
and xTB relaxation). The core never imports it; ``zoo/__init__`` imports ``configurables`` so
that ``import zoo`` knows every gin name, and ``zoo.boltzmann`` rebuilds flows from stored configs
through ``config`` and ``runs``.
"""
