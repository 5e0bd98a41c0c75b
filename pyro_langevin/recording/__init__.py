"""Your own recording: NWB files or arrays in, a LangevinFlow fit, rates, latents and an honest score out.

A wing on the core (it imports the model, the guides, training and the shared members, folds and
scores of :mod:`pyro_langevin.members` and :mod:`pyro_langevin.crossval`; the core never imports it).
One file per job (docs/recording.md):

* :mod:`~pyro_langevin.recording.data`: a recording as trials x bins x units
  (:class:`~pyro_langevin.recording.data.Recording`), its batches, and the arrays reader;
* :mod:`~pyro_langevin.recording.nwb`: the NWB reader (pynwb): trials aligned on an event, binned units;
* :mod:`~pyro_langevin.recording.config`: the run spec and its defaults, chosen by the recording's size;
* :mod:`~pyro_langevin.recording.run`: co-smoothing cross-validation, the fit, ``posterior.nc``,
  figures and ``metrics.json`` (:func:`~pyro_langevin.recording.run.fit_recording`);
* :mod:`~pyro_langevin.recording.summary`: posterior summaries per trial and per condition (numbers);
* :mod:`~pyro_langevin.recording.figures`: rasters, PSTHs, latent paths, the CV folds (pictures);
* :mod:`~pyro_langevin.recording.cli`: the ``pyro-langevin fit`` command;
* :mod:`~pyro_langevin.recording.stitch`: several recordings (sessions with different units) stitched into
  one model; :mod:`~pyro_langevin.recording.new_session`: a session added to a saved run;
  :mod:`~pyro_langevin.recording.stitch_cli`: the command with several files or ``--from`` (docs/stitching.md).

Import from the submodules; this package imports nothing itself.
"""
