"""Generation: the token loop (`loop`), sampling, Harmony stream parsing, MoE routing telemetry,
and the answer/chat/batch layers the `relief generate` and `relief chat` commands call."""

from .engine import Answer, AnswerStream, Engine, GenerateConfig, answer, complete
from .harmony_stream import Delta, HarmonyStream
from .loop import BatchDecoder, PromptCache, Step, generate_tokens
from .moe import RoutingError, RoutingProbe, RoutingReport
from .sampling import SamplingConfig

__all__ = ["Answer", "AnswerStream", "BatchDecoder", "Delta", "Engine", "GenerateConfig", "HarmonyStream",
           "PromptCache", "RoutingError", "RoutingProbe", "RoutingReport", "SamplingConfig", "Step", "answer",
           "complete", "generate_tokens"]
