"""Utilities the library and the application share: atomic I/O (:mod:`.io`), processes
(:mod:`.distributed`), identities of weights, tokenizers and rows (:mod:`.identity`), tensor helpers (:mod:`.tensors`)."""
