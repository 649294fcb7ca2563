"""Training and evaluating soft prompts for softprompt-server: ``softprompt train`` and ``softprompt eval``.

Modules: :mod:`training.data` (data files and the template), :mod:`training.train` (the PEFT training loop),
:mod:`training.peft_setup` (the methods, prompt tuning, p-tuning and prefix tuning, and the PEFT wrap),
:mod:`training.adapter` (the saved adapter directory and its upload), :mod:`training.evaluate` (base /
instruction / soft-prompt comparison), :mod:`training.cli` (the two commands).
Importing this package imports neither torch nor PEFT; the modules do.
"""
