"""The Neural Latents Benchmark: data, configuration, training runs, scoring and the baseline.

One file per job:

* :mod:`~pyro_langevin.nlb.data`: NLB tensors and NWB files as :class:`~pyro_langevin.batch.Batch` es;
* :mod:`~pyro_langevin.nlb.compat`: shims that keep ``nlb_tools`` working on current pandas;
* :mod:`~pyro_langevin.nlb.rebin`: coarser bins from a tensor folder (5 ms -> 20 ms);
* :mod:`~pyro_langevin.nlb.coarse`: fitting 5 ms data at 20 ms, and the rates back to 5 ms;
* :mod:`~pyro_langevin.nlb.config`: per-dataset defaults of a run;
* :mod:`~pyro_langevin.nlb.scoring`: co-bps, fp-bps, vel R^2 through ``nlb_tools``, submission files;
* :mod:`~pyro_langevin.nlb.baseline`: the spike-smoothing baseline;
* :mod:`~pyro_langevin.nlb.pipeline`: train, select, export and score a run (:func:`run_nlb`);
* :mod:`~pyro_langevin.nlb.cv`: K-fold cross-validation over the training trials.

Import from the submodules; this package imports nothing itself, so that loading the data does
not pull in the model.
"""
