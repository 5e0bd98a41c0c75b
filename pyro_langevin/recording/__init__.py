"""Your own recording: NWB files or arrays in, a LangevinFlow fit, rates, latents and an honest score out.

A wing on the core (it imports the model, the guides, training and the shared cross-validation; the
core never imports it). One file per job:

* :mod:`~pyro_langevin.recording.data`: a recording as trials x bins x units (:class:`~pyro_langevin.recording.data.Recording`),
  its batches, and the arrays reader;
* :mod:`~pyro_langevin.recording.nwb`: the NWB reader (pynwb): trials aligned on an event, binned units;

Import from the submodules; this package imports nothing itself.
"""
