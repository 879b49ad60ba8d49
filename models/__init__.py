"""The science of HyMiRec and RED-Rec in pure PyTorch/numpy/faiss: no Kafka, no Redis in here."""
