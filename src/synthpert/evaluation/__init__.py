"""What scores answers: metrics, the questions asked and their answers, baselines, predictions files."""
