"""The numpy-only input side: tokenizer + chat template, audio mel features, image / video patches, media
loading, and the `Processor` that turns conversations into batches (HF Qwen2_5OmniProcessor key names)."""
from omni_jax.processing.audio import (
    AudioFeatureConfig,
    AudioFeatureExtractor,
    audio_token_count,
    extract_features,
    num_feature_frames,
)
from omni_jax.processing.chat_template import render_chat
from omni_jax.processing.image import ImageProcessor, ImageProcessorConfig, preprocess_image, smart_resize
from omni_jax.processing.media import MediaError, Video, load_audio, load_image, load_video
from omni_jax.processing.processor import Processor
from omni_jax.processing.tokenizer import Tokenizer, write_qwen_tokenizer
from omni_jax.processing.video import VideoProcessor, VideoProcessorConfig, preprocess_video

__all__ = [
    "AudioFeatureConfig",
    "AudioFeatureExtractor",
    "ImageProcessor",
    "ImageProcessorConfig",
    "MediaError",
    "Processor",
    "Tokenizer",
    "Video",
    "VideoProcessor",
    "VideoProcessorConfig",
    "audio_token_count",
    "extract_features",
    "load_audio",
    "load_image",
    "load_video",
    "num_feature_frames",
    "preprocess_image",
    "preprocess_video",
    "render_chat",
    "smart_resize",
    "write_qwen_tokenizer",
]
