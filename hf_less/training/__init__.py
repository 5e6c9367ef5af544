"""The Trainer integration: :class:`hf_less.LessCallback` (:mod:`.callback`), ``LessSFTConfig``
(:mod:`.config`) and ``LessSFTTrainer`` (:mod:`.trainer`)."""
