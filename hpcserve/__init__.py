"""hpcserve: an LLM inference service for Slurm/HPC sites.

``from hpcserve import LLM, SamplingParams`` is the offline Python API (see
``hpcserve.engine.llm``). Importing the package itself is light: torch loads
only when an engine is built.
"""

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from hpcserve.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from hpcserve.engine.request import SamplingParams

        return SamplingParams
    raise AttributeError(name)
