"""Stop strings: a sample finishes at the token that completes the first occurrence of a stop string in its
decoded completion, matched across token boundaries (transformers' ``StopStringCriteria`` semantics: the
completing token is kept whole, overhang included; nothing after it).

Matching runs on the host after every engine step, where the step's tokens are read anyway: each row's window
ending at its newest token (long enough to hold any stop string) is decoded, all rows in one batched
``tokenizer.batch_decode``; a window holds a stop string only if the newest token completed it, so nothing is
trimmed afterwards and nothing streamed is taken back.
"""


class StopStrings:
    """The stop strings of one call and the tokenizer that decodes them."""

    def __init__(self, stop_strings, tokenizer):
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if not isinstance(stop_strings, (list, tuple)) or not stop_strings:
            raise TypeError(f"stop_strings must be a non-empty list of strings, got {stop_strings!r}")
        for string in stop_strings:
            if not isinstance(string, str) or not string:
                raise ValueError(f"stop_strings must hold non-empty strings, got {string!r}")
        if tokenizer is None:
            raise ValueError("stop_strings need tokenizer= (the model's tokenizer decodes the completions)")
        if not hasattr(tokenizer, "batch_decode"):
            raise TypeError(f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
        self.strings = tuple(stop_strings)
        self.tokenizer = tokenizer
        # A stop string of c characters spans at most 4c tokens (byte-level BPE: a token may hold one byte of a
        # UTF-8 character); a few more tokens on the left keep the window's own left edge (a SentencePiece
        # leading space, a cut character) away from any match.
        self.window = 4 * max(len(string) for string in self.strings) + 4

    def holds_stop(self, windows: list) -> list:
        """For each window (a list of token ids), whether its decoded text holds a stop string."""
        texts = self.tokenizer.batch_decode(windows, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return [any(string in text for string in self.strings) for text in texts]
