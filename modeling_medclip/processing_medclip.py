"""MedCLIPProcessor: the X-ray image processor and the report tokenizer behind one call."""

from transformers import ProcessorMixin


class MedCLIPProcessor(ProcessorMixin):
    r"""
    Wraps a [`MedCLIPImageProcessor`] and a fast BERT tokenizer (Bio_ClinicalBERT's for the released models) into a
    single processor, used by ConVIRT and MedCLIP alike.

    Texts are truncated to 77 tokens and padded to the longest text of the call unless told otherwise (`max_length`,
    `padding`, `truncation` as keyword arguments). A text that is empty or blank, not a `str` (e.g. `bytes` or a
    number) or not valid Unicode (an unpaired surrogate) raises a `ValueError` naming its position and type.

    Args:
        image_processor ([`MedCLIPImageProcessor`]): the image processor.
        tokenizer ([`PreTrainedTokenizerFast`]): the tokenizer.

    Example:

    ```python
    >>> processor = MedCLIPProcessor(image_processor, tokenizer)
    >>> inputs = processor(text=["no pleural effusion"], images=[image], return_tensors="pt")
    >>> sorted(inputs.keys())
    ['attention_mask', 'input_ids', 'pixel_values', 'token_type_ids']
    ```"""

    text_kwargs = {"padding": True, "truncation": True, "max_length": 77}

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    def validate_inputs(self, images=None, text=None, **kwargs):
        if text is not None:
            texts = list(text) if isinstance(text, (list, tuple)) else [text]
            if len(texts) == 0:
                raise ValueError("`text` is an empty list: give at least one report or prompt")
            for index, item in enumerate(texts):
                problem = text_problem(item)
                if problem is not None:
                    raise ValueError(f"text #{index} {problem}")
        super().validate_inputs(images=images, text=text, **kwargs)


def text_problem(text) -> str | None:
    """What makes `text` unusable as a report or prompt (`None` if nothing): not a `str`, not valid Unicode, blank."""
    if isinstance(text, (bytes, bytearray)):
        return f"is of type {type(text).__name__}, expected a string: decode it first (e.g. `text.decode('utf-8')`)"
    if not isinstance(text, str):
        return f"is of type {type(text).__name__} ({text!r:.40}), expected a string"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return (
            f"contains an unpaired surrogate {text[error.start]!r} at position {error.start}: not valid Unicode (fix "
            "the encoding of its source, or read it with errors='replace')"
        )
    if not text.strip():
        return "is empty: every report or prompt needs some words"
    return None


__all__ = ["MedCLIPProcessor", "text_problem"]
