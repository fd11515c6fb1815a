"""SynthPert: predict CRISPRi knockdown effects with a small LLM fine-tuned on
critic-filtered synthetic reasoning traces (PerturbQA benchmark)."""

__version__ = "0.1.0"
