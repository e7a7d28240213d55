"""Human preference collection: sample candidates, annotate pairs in Label Studio (or read SageMaker Ground Truth
output), turn the picks into DPO pairs for the next round of training. Commands: `raydpo collect ...`."""
