"""An example raypipe plugin: a pretraining objective and a fine-tuning task of one's own."""
