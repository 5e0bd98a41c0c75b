"""The Neural Latents Benchmark wing: data, configuration, runs, scoring, the baseline, the search and
their commands. It imports the core (model, guides, training, posterior); the core never imports it.

One file per job:

* :mod:`~pyro_langevin.nlb.data`: NLB tensors and NWB files as :class:`~pyro_langevin.batch.Batch` es;
* :mod:`~pyro_langevin.nlb.compat`: shims that keep ``nlb_tools`` working on current pandas;
* :mod:`~pyro_langevin.nlb.rebin`: coarser bins from a tensor folder (5 ms -> 20 ms);
* :mod:`~pyro_langevin.nlb.coarse`: fitting 5 ms data at 20 ms, and the rates back to 5 ms;
* :mod:`~pyro_langevin.nlb.config`: per-dataset defaults of a run (:class:`~pyro_langevin.nlb.config.NLBConfig`);
* :mod:`~pyro_langevin.nlb.request`: one run as asked for (:class:`~pyro_langevin.nlb.request.NLBRequest`);
* :mod:`~pyro_langevin.nlb.members`: the NLB data and bins of the members' recipe (the core's
  :mod:`pyro_langevin.members`, trained on the core's :mod:`pyro_langevin.executor`: this process,
  local worker processes or Ray tasks), shared by runs, cross-validation and the search;
* :mod:`~pyro_langevin.nlb.scoring`: co-bps, fp-bps, vel R^2 through ``nlb_tools``, submission files
  (local scores are the core's :mod:`pyro_langevin.scoring`);
* :mod:`~pyro_langevin.nlb.baseline`: the spike-smoothing baseline with nlb_tools' kernel widths;
* :mod:`~pyro_langevin.nlb.pipeline`: train, select, export and score a run (:func:`~pyro_langevin.nlb.pipeline.run_nlb`);
* :mod:`~pyro_langevin.nlb.cv`: K-fold cross-validation over the training trials (the core's folds,
  :mod:`pyro_langevin.crossval`);
* :mod:`~pyro_langevin.nlb.tune`: the hyperparameter search on Ray Tune;
* :mod:`~pyro_langevin.nlb.cli`: the ``nlb`` and ``tune`` commands.

Import from the submodules; this package imports nothing itself, so that loading the data does
not pull in the model.
"""
