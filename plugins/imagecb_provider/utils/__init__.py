"""Logic the operators, sensors and triggers share: the submission ledger, waiting, pacing."""
