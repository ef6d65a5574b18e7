"""Running a trained model: the inferencer (whole image, sliding window, multi-scale + flip),
evaluation (training's and the evaluate command's), checkpoint testing with its reports,
prediction on raw images and ONNX export."""
