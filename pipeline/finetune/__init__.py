"""Fine-tuning: a pretrained encoder becomes the classifier each defense deploys (MAE recipe,
NIM De³, DMAE smoothing base classifiers, MIMIR adversarial training), on the pretraining engine."""
