# Fixtures that several modules here share. Defined in trainer_helpers; imported here rather than
# into each module, where pytest would set a session fixture up once per importing module.
from trainer_helpers import process_group, short_run  # noqa: F401
