"""TFLite flatbuffers: float, uint8 quantization-aware and int8 post-training MobileNets.

Inputs, from the [0, 1] images every Embedder takes:
- float inputs get [-1, 1] (TF-Slim's range), unless the file carries our metadata
  entry ``imgembed.input_range = unit`` (files written by ``imgembed quantize``),
  which means [0, 1];
- uint8 inputs get the raw pixels, the convention of quantization-aware MobileNets
  (scale 1/128, zero point 128: exactly [-1, 1]);
- int8 inputs get the real value (as for float) quantized with the tensor's scale
  and zero point.
Outputs are dequantized. The feature-vector flavour reads the pooled feature
``MobilenetV1/Logits/AvgPool_1a/AvgPool``: a classifier file is cut there. A chain
``extractor.tflite+head.tflite`` feeds each file's output to the next.

Interpreters are not thread-safe, and RunInference shares one model between
threads, so each file's interpreter runs under a lock.
"""

from __future__ import annotations

import os
import pathlib
import threading

import numpy as np

from imgembed.models.embedder import Embedder, scale_pixels
from imgembed.models.errors import ModelLoadError
from imgembed.models.registry import Flavour, Format, ModelSpec

POOLED_FEATURE = "MobilenetV1/Logits/AvgPool_1a/AvgPool"
INPUT_RANGE_METADATA = "imgembed.input_range"
UNIT_RANGE = b"unit"


def interpreter_class():
    """LiteRT, TFLite's runtime since TF 2.20, else the copy inside TensorFlow."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - depends on what is installed
        from tensorflow.lite.python.interpreter import Interpreter
    return Interpreter


def _schema():
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


def read_model(data: bytes):
    schema = _schema()
    try:
        return schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))
    except Exception as error:  # flatbuffers raises struct errors and friends on junk
        raise ModelLoadError(f"not a TFLite flatbuffer: {error}") from error


def write_model(model) -> bytes:
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def metadata_value(model, name: str) -> bytes | None:
    for entry in model.metadata or []:
        if entry.name and entry.name.decode() == name:
            return bytes(model.buffers[entry.buffer].data)
    return None


def add_metadata(data: bytes, name: str, value: bytes) -> bytes:
    schema = _schema()
    model = read_model(data)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(value, dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = name.encode()
    entry.buffer = len(model.buffers) - 1
    model.metadata = (model.metadata or []) + [entry]
    return write_model(model)


def global_pools_as_means(data: bytes) -> bytes:
    """The model with each average pool over a whole int8 feature map (MobileNet's
    last pool) replaced by a MEAN over height and width, which it equals. XNNPACK
    takes int8 MEAN but not int8 AVERAGE_POOL_2D: the pool alone split the model
    into two delegate partitions run by TFLite's kernel in between; as a MEAN the
    whole model runs in XNNPACK (1.0_224: 4% faster measured alternately), with
    the same vectors except where a mean falls on a rounding tie, which the kernels
    break differently by one int8 step: on 1.0_224's 7x7 map, 100 ImageNet images
    gave identical vectors."""
    schema = _schema()
    ops = schema.BuiltinOperator
    model = read_model(data)
    graph = model.subgraphs[0]

    def is_global_int8_pool(op) -> bool:
        code = model.operatorCodes[op.opcodeIndex]
        if max(code.builtinCode, code.deprecatedBuiltinCode) != ops.AVERAGE_POOL_2D:
            return False
        options, source = op.builtinOptions, graph.tensors[op.inputs[0]]
        _, height, width, _ = source.shape
        return (
            source.type == schema.TensorType.INT8
            and (options.filterHeight, options.filterWidth) == (height, width)
            and options.padding == schema.Padding.VALID
            and options.fusedActivationFunction == schema.ActivationFunctionType.NONE
        )

    pools = [op for op in graph.operators if is_global_int8_pool(op)]
    if not pools:
        return data
    mean = schema.OperatorCodeT()
    mean.builtinCode = mean.deprecatedBuiltinCode = ops.MEAN
    mean.version = 2  # int8
    model.operatorCodes.append(mean)
    axes_buffer = schema.BufferT()
    axes_buffer.data = np.frombuffer(np.array([1, 2], np.int32).tobytes(), np.uint8)
    model.buffers.append(axes_buffer)
    axes = schema.TensorT()
    axes.shape, axes.type, axes.buffer, axes.name = (
        [2],
        schema.TensorType.INT32,
        len(model.buffers) - 1,
        b"mean_axes",
    )
    graph.tensors.append(axes)
    for op in pools:
        op.opcodeIndex = len(model.operatorCodes) - 1
        op.inputs = np.array([op.inputs[0], len(graph.tensors) - 1], np.int32)
        op.builtinOptionsType = schema.BuiltinOptions.ReducerOptions
        op.builtinOptions = schema.ReducerOptionsT()
        op.builtinOptions.keepDims = True
    return write_model(model)


def cut_at(data: bytes, tensor_name: str) -> bytes:
    """The same model with ``tensor_name`` as its only output and the ops after it removed."""
    model = read_model(data)
    graph = model.subgraphs[0]
    names = [tensor.name.decode() for tensor in graph.tensors]
    if tensor_name not in names:
        raise ModelLoadError(f"the model has no tensor {tensor_name!r}")
    index = names.index(tensor_name)
    producer = next(i for i, op in enumerate(graph.operators) if index in list(op.outputs))
    graph.operators = graph.operators[: producer + 1]
    graph.outputs = np.array([index], dtype=np.int32)
    return write_model(model)


def ops_outside_delegates(data: bytes) -> list[str]:
    """The ops of a model that its interpreter's delegates (XNNPACK, applied by
    default) leave to TFLite's own kernels, with the type of their first input: a
    slower path, and in int8 models a float op means a layer kept float. TFLite
    lists a replaced node beside the DELEGATE node that runs it; a node belongs to a
    delegate when it lies between that delegate's inputs and outputs."""
    interpreter = interpreter_class()(model_content=data, num_threads=1)
    interpreter.allocate_tensors()
    nodes = interpreter._get_ops_details()  # noqa: SLF001 - the only listing of nodes LiteRT offers
    dtypes = {tensor["index"]: tensor["dtype"].__name__ for tensor in interpreter.get_tensor_details()}
    producer = {out: node for node in nodes if node["op_name"] != "DELEGATE" for out in node["outputs"]}
    delegated: set[int] = set()
    for delegate in (node for node in nodes if node["op_name"] == "DELEGATE"):
        boundary, pending = set(delegate["inputs"]), list(delegate["outputs"])
        while pending:
            node = producer.get(pending.pop())
            if node is not None and node["index"] not in delegated:
                delegated.add(node["index"])
                pending += [tensor for tensor in node["inputs"] if tensor not in boundary]
    return [
        f"{node['op_name']} ({dtypes.get(node['inputs'][0], '?')})"
        for node in nodes
        if node["op_name"] != "DELEGATE" and node["index"] not in delegated
    ]


def _feature_output(data: bytes, where: str) -> bytes:
    """The file cut at its pooled feature if it is a MobileNet classifier; files that
    end at a feature already (extractors, our quantized feature models) unchanged."""
    graph = read_model(data).subgraphs[0]
    names = [tensor.name.decode() for tensor in graph.tensors]
    outputs = [graph.tensors[index] for index in graph.outputs]
    if POOLED_FEATURE in names and POOLED_FEATURE not in [tensor.name.decode() for tensor in outputs]:
        return cut_at(data, POOLED_FEATURE)
    if int(np.prod(outputs[0].shape[1:])) in (1000, 1001):
        raise ModelLoadError(
            f"{where} is a classifier without a {POOLED_FEATURE} tensor to read features from; "
            "append #classification to use its class scores"
        )
    return data


class _Stage:
    """One interpreter, run on one image at a time: the MobileNet files fix their
    batch at 1 (a Reshape to [1, 1001]), so batches are looped."""

    def __init__(self, data: bytes, threads: int | None, where: str):
        try:
            self.interpreter = interpreter_class()(model_content=data, num_threads=threads)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as error:
            raise ModelLoadError(f"{where}: TFLite cannot load it: {error}") from error
        (self.input,) = self.interpreter.get_input_details()
        self.output = self.interpreter.get_output_details()[0]
        self.unit_range = metadata_value(read_model(data), INPUT_RANGE_METADATA) == UNIT_RANGE
        self.lock = threading.Lock()

    def quantize_input(self, real: np.ndarray) -> np.ndarray:
        dtype = self.input["dtype"]
        scale, zero_point = self.input["quantization"]
        if dtype == np.float32:
            return np.asarray(real, dtype=np.float32)  # set_tensor copies it anyway
        values = np.round(real / scale + zero_point)
        info = np.iinfo(dtype)
        return np.clip(values, info.min, info.max).astype(dtype)

    def run(self, value: np.ndarray) -> np.ndarray:
        with self.lock:
            self.interpreter.set_tensor(self.input["index"], value[None])
            self.interpreter.invoke()
            raw = self.interpreter.get_tensor(self.output["index"])[0]
        return self._dequantize(raw)

    def run_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """A float, [0, 1] input: uint8 pixels scaled straight into the interpreter's
        input buffer, the values scale_pixels gives without its float copy."""
        with self.lock:
            # The buffer's view must be gone before invoke(): TFLite refuses to run
            # while numpy holds its memory, so it lives only in this statement.
            np.divide(pixels, 255.0, out=self.interpreter.tensor(self.input["index"])()[0], dtype=np.float32)
            self.interpreter.invoke()
            raw = self.interpreter.get_tensor(self.output["index"])[0]
        return self._dequantize(raw)

    def _dequantize(self, raw: np.ndarray) -> np.ndarray:
        scale, zero_point = self.output["quantization"]
        if raw.dtype != np.float32 and scale:
            return (raw.astype(np.float32) - zero_point) * scale
        return raw.astype(np.float32)


class TFLiteModel:
    def __init__(self, source: str, flavour: Flavour, threads: int | None = None):
        paths = source.split("+")
        datas = []
        for path in paths:
            try:
                datas.append(pathlib.Path(path).read_bytes())
            except OSError as error:
                raise ModelLoadError(f"cannot read {path}: {error}") from error
        if flavour is Flavour.FEATURE_VECTOR:
            datas[-1] = _feature_output(datas[-1], source)
        self.stages = [_Stage(data, threads, path) for data, path in zip(datas, paths, strict=True)]
        shape = self.stages[0].input["shape"]
        if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3:
            raise ModelLoadError(f"{source}: expected a [1, S, S, 3] image input, found {list(shape)}")
        self.image_size = int(shape[1])

    def _first_input(self, image: np.ndarray) -> np.ndarray:
        stage = self.stages[0]
        if stage.input["dtype"] == np.uint8 and not stage.unit_range:
            return np.round(image * 255.0).astype(np.uint8)  # raw pixels
        real = image if stage.unit_range else image * 2.0 - 1.0
        return stage.quantize_input(real)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.stack([self._rest(self.stages[0].run(self._first_input(image))) for image in images])

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 pixels -> exactly ``self(scale_pixels(pixels))``. When the first file
        takes [0, 1] floats (the models we convert) each image is scaled straight into
        it: 0.08 ms less an image, 7% of 0.25_224's model call."""
        first = self.stages[0]
        if first.input["dtype"] != np.float32 or not first.unit_range:
            return self(scale_pixels(pixels))
        return np.stack([self._rest(first.run_pixels(image)) for image in pixels])

    def _rest(self, value: np.ndarray) -> np.ndarray:
        """The first file's output through the files chained after it."""
        for stage in self.stages[1:]:
            value = stage.run(stage.quantize_input(value.reshape(stage.input["shape"][1:])))
        return value.reshape(-1)


def describe(source: str, flavour: Flavour) -> ModelSpec:
    model = TFLiteModel(source, flavour)
    width = model(np.zeros([1, model.image_size, model.image_size, 3], np.float32)).shape[1]
    stem = "+".join(os.path.splitext(os.path.basename(path))[0] for path in source.split("+"))
    name = stem + ("_classification" if flavour is Flavour.CLASSIFICATION else "")
    return ModelSpec(name, source, model.image_size, width, flavour, Format.TFLITE)


def embedder(spec: ModelSpec, source: str, threads: int | None = None) -> Embedder:
    model = TFLiteModel(source, spec.flavour, threads)
    return Embedder(spec, model, call_pixels=model.embed_pixels)


def load(spec: ModelSpec, threads: int | None = None) -> Embedder:
    return embedder(spec, spec.source, threads)
