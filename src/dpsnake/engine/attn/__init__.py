"""se_atten / se_atten_v2 (DPA-1) models on the built-in engine: the loader (model.py), the
descriptor with its hand-written backward (descriptor.py), the attention layers (attention.py) and
``AttnEnsemble`` (ensemble.py: the contract of ``dpsnake.engine.ensemble.Ensemble``)."""
