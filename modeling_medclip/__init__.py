"""medclip-hf: ConVIRT and MedCLIP as transformers models.

Importing the package registers the configs, models, image processor and processor with the transformers Auto
classes, so `AutoModel.from_pretrained(folder)` and `AutoProcessor.from_pretrained(folder)` work on saved folders.
Saved folders also carry the model code (`register_for_auto_class`), so a process that never imports this package
loads them with `trust_remote_code=True`.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from .configuration_medclip import ConVIRTConfig, DualEncoderConfig, MedCLIPConfig
from .image_processing_medclip import MedCLIPImageProcessor
from .modeling_medclip import (
    ConVIRTForImageClassification,
    ConVIRTModel,
    DualEncoderForImageClassification,
    DualEncoderModel,
    DualEncoderOutput,
    MedCLIPForImageClassification,
    MedCLIPModel,
)
from .processing_medclip import MedCLIPProcessor

__version__ = "0.1.0"


def _register() -> None:
    for config_class, model_class, classifier_class in (
        (ConVIRTConfig, ConVIRTModel, ConVIRTForImageClassification),
        (MedCLIPConfig, MedCLIPModel, MedCLIPForImageClassification),
    ):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
        AutoModelForZeroShotImageClassification.register(config_class, model_class, exist_ok=True)
        AutoModelForImageClassification.register(config_class, classifier_class, exist_ok=True)
        AutoImageProcessor.register(config_class, image_processor_classes={"pil": MedCLIPImageProcessor}, exist_ok=True)
        AutoProcessor.register(config_class, MedCLIPProcessor, exist_ok=True)

        config_class.register_for_auto_class()
        model_class.register_for_auto_class("AutoModel")
        classifier_class.register_for_auto_class("AutoModelForImageClassification")
    MedCLIPImageProcessor.register_for_auto_class("AutoImageProcessor")
    MedCLIPProcessor.register_for_auto_class("AutoProcessor")


_register()

__all__ = [
    "ConVIRTConfig",
    "ConVIRTForImageClassification",
    "ConVIRTModel",
    "DualEncoderConfig",
    "DualEncoderForImageClassification",
    "DualEncoderModel",
    "DualEncoderOutput",
    "MedCLIPConfig",
    "MedCLIPForImageClassification",
    "MedCLIPImageProcessor",
    "MedCLIPModel",
    "MedCLIPProcessor",
]
