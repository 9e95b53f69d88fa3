"""A trained checkpoint put to use: read once (trained), evaluated on a labelled site (evaluation), classifying a
folder (prediction), explained with Grad-CAM (gradcam). The commands evaluate, predict and explain are their
command lines."""
