"""Which models a request with images may run on, and the plan it runs as a result.

A model sees images when its config entry says ``vision: true``, and, for an image given by URL,
when its provider's API takes URLs: OpenAI's (and an OpenAI-compatible server's, whose wire is the
same) and Anthropic's do; Gemini's takes only inline data or uploaded files, and the service never
fetches a URL itself (no request made on a client's behalf to an address it chose). For a request
with images, every other model leaves the plan: a proposer leaves its layer (which still needs its
quorum from those that remain: all of them when it had none), the aggregator chain and the
fallbacks keep only models that see (an aggregator must see the image to judge the proposals).
A layer left short of its quorum, or a chain left empty, is the client's 400, naming it, before
any model is called.
"""

from __future__ import annotations

from collections.abc import Sequence

from moa.config import MoAConfig, ProviderKind
from moa.errors import InvalidRequest
from moa.plan import LayerSpec, ModelRef, Plan, PlanShape
from moa.types import ChatMessage, ImagePart, request_images

# Providers whose APIs take an image by URL (the others only as data).
_TAKE_URLS = frozenset({ProviderKind.OPENAI, ProviderKind.ANTHROPIC, ProviderKind.OPENAI_COMPATIBLE})


class NoVisionModel(InvalidRequest):
    """A request with images that a layer or the aggregator chain of its plan cannot answer: too
    few of its models see images (or take them by URL)."""

    code = "images_not_supported"

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.param = param


def sees(config: MoAConfig, ref: ModelRef, images: Sequence[ImagePart]) -> bool:
    """Whether ``ref`` can be sent these images (always, without any)."""
    if not images:
        return True
    provider = config.providers.get(ref.provider)
    if provider is None or not provider.price(ref.model).vision:
        return False
    return provider.kind in _TAKE_URLS or all(image.is_data for image in images)


def why_not(config: MoAConfig, ref: ModelRef, images: Sequence[ImagePart]) -> str:
    provider = config.providers.get(ref.provider)
    if provider is not None and provider.price(ref.model).vision:
        return f"{ref} (its API takes no image URL)"
    return f"{ref} (no vision)"


def for_images(config: MoAConfig, plan: Plan, messages: Sequence[ChatMessage]) -> Plan:
    """``plan`` with only the models that see the messages' images (the plan itself without any);
    ``NoVisionModel`` when a layer or the aggregator chain is left unable to answer."""
    images = request_images(messages)
    if not images:
        return plan
    layers = []
    for index, layer in enumerate(plan.layers, start=1):
        kept = tuple(p for p in layer.proposers if sees(config, p, images))
        # The quorum stands; "all of them" (none set) now means all that remain.
        if not kept or (layer.quorum is not None and len(kept) < layer.quorum):
            gone = ", ".join(why_not(config, p, images) for p in layer.proposers if p not in kept)
            raise NoVisionModel(
                f"layer {index} cannot meet its quorum of {layer.quorum or 1} for a request with "
                f"images: {len(kept)} of its {len(layer.proposers)} proposers see them (not {gone})"
            )
        layers.append(LayerSpec(proposers=kept, quorum=layer.quorum))
    aggregators = tuple(a for a in plan.aggregators if sees(config, a, images))
    if not aggregators:
        gone = ", ".join(why_not(config, a, images) for a in plan.aggregators)
        raise NoVisionModel(
            f"no aggregator of the plan sees the request's images, and the one that answers must (not {gone})"
        )
    fallbacks = tuple(f for f in plan.fallbacks if sees(config, f, images))
    same = (
        aggregators == plan.aggregators
        and fallbacks == plan.fallbacks
        and all(len(a.proposers) == len(b.proposers) for a, b in zip(layers, plan.layers, strict=True))
    )
    if same:
        return plan
    return plan.model_copy(
        update={"layers": tuple(layers), "aggregators": aggregators, "fallbacks": fallbacks}
    )


def shaped(config: MoAConfig, shape: PlanShape, messages: Sequence[ChatMessage]) -> PlanShape:
    """``shape`` (a request's overrides) followed by ``for_images``: what any plan the request
    may run (its routed plan, a cheaper tier) is made into."""
    return lambda plan: for_images(config, shape(plan), messages)
