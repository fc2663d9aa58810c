"""Importers: bring a campaign of another tool over to a dpsnake config (``dpsnake import-dpgen``).

- ``dpgen``: the command; DP-GEN's ``param.json`` -> config.yaml, with the table of what is not carried.
- ``dpgen_common``: the import context (the keys read, the "not carried over" table, where values came from).
- ``dpgen_systems``: ``sys_configs`` -> systems, trust levels, ``model_devi_jobs`` -> exploration stages.
- ``dpgen_data``: ``init_data_sys`` and an existing run's ``iter.*/02.fp/data.*`` -> per-system init data.
- ``dpgen_label``: ``fp_style`` + its keys -> the ``label`` section; ``dpgen_train``: the ``train`` section.
- ``machine``: DP-GEN's ``machine.json`` (dpdispatcher) -> a Snakemake profile.
"""
