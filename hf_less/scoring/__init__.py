"""Target scorers: LESS (:mod:`.less`, :class:`hf_less.LessSelector`), the cheap representations
(:mod:`.representations`: rds, embedding, ...) and the similarity maths they share (:mod:`.similarity`)."""
