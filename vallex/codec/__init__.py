"""Audio <-> discrete codes: EnCodec (:mod:`.encodec`) or a tokenizer fitted to the corpus (:mod:`.mel_rvq`).

``open_tokenizer(manifest["codec"], prepared_dir)`` gives the one that made a prepared corpus's codes.
"""

from vallex.codec.tokenizer import open_tokenizer

__all__ = ["open_tokenizer"]
