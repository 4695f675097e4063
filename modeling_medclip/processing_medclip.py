"""MedCLIPProcessor: the X-ray image processor and the report tokenizer behind one call."""

from transformers import ProcessorMixin


class MedCLIPProcessor(ProcessorMixin):
    r"""
    Wraps a [`MedCLIPImageProcessor`] and a fast BERT tokenizer (Bio_ClinicalBERT's for the released models) into a
    single processor, used by ConVIRT and MedCLIP alike.

    Texts are truncated to 77 tokens and padded to the longest text of the call unless told otherwise (`max_length`,
    `padding`, `truncation` as keyword arguments). Empty or blank texts raise a `ValueError` naming their position.

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
            texts = [text] if isinstance(text, str) else text
            if len(texts) == 0:
                raise ValueError("`text` is an empty list: give at least one report or prompt")
            for index, item in enumerate(texts):
                if not isinstance(item, str):
                    raise ValueError(f"text #{index} is a {type(item).__name__}, expected a string")
                if not item.strip():
                    raise ValueError(f"text #{index} is empty: every report or prompt needs some words")
        super().validate_inputs(images=images, text=text, **kwargs)


__all__ = ["MedCLIPProcessor"]
