"""Reader studies: clinicians against the models, and clinicians with the models (see README, "Reader studies").

- `schema`: the one table format of reads every part uses (database export, simulation, analysis).
"""
