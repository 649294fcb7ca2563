"""softprompt-server: one frozen causal LM, many tasks, each a soft prompt, served in mixed-task batches."""

__version__ = "0.1.0"
