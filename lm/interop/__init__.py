"""Checkpoint interop: Meta and Hugging Face Llama weights in, Hugging Face weights out.

  sources.py         read a Meta (consolidated.NN.pth + params.json) or Hugging Face (config.json
                     + safetensors) directory one tensor at a time, in HF names and layout
  streaming.py       write our Orbax checkpoint one layer slab at a time; read it back the same way
  importer.py        source -> our model directory (`lm convert`)
  exporter.py        our model directory -> Hugging Face directory (`lm export`)
  safetensors_io.py  a streaming safetensors reader and writer
  output.py          atomic output directories

The per-tensor layout mappings live in lm/convert.py. Nothing here holds more than one source
tensor and one layer of one parameter on the host at a time, so converting 70B needs a few GB of
RAM, not the model's size.
"""
