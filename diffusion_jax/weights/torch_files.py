"""`torch.save` files read and written without torch: state dicts of arrays, nothing else.

Two layouts exist (torch/serialization.py):
  zip (torch >= 1.6): records <name>/data.pkl (pickle protocol 2 of the object, each storage a
    persistent id ('storage', storage_type, key, location, numel)), <name>/data/<key> (raw
    bytes), <name>/byteorder ('little' / 'big'; absent = little), <name>/version, ...
  legacy (torch < 1.6, e.g. pytorch-fid's 2019 file): pickles of the magic number, protocol
    version 1001 and sys_info, then the object with persistent ids ('storage', storage_type,
    root_key, location, numel, view_metadata), then the sorted list of storage keys, then per
    key an int64 element count and the raw bytes.
A tensor is `torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride,
requires_grad, backward_hooks[, metadata])`. The unpickler resolves only those names, the
storage types and collections.OrderedDict, so a file can build arrays and dicts, nothing else.
"""

from __future__ import annotations

import collections
import functools
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import NamedTuple

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001
_ZIP_ALIGNMENT = 64  # torch aligns each record's data to 64 bytes (for mmap)

_STORAGE_DTYPES = {
    'DoubleStorage': np.dtype(np.float64), 'FloatStorage': np.dtype(np.float32),
    'HalfStorage': np.dtype(np.float16), 'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype(np.int64), 'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16), 'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8), 'BoolStorage': np.dtype(np.bool_),
}
_STORAGE_NAMES = {v: k for k, v in _STORAGE_DTYPES.items()}


class _TorchFileError(ValueError):
  """A one-line, file-naming error of `load_torch_state_dict`."""


class _StorageType(NamedTuple):
  name: str
  dtype: np.dtype


class _StorageRef(NamedTuple):
  key: str
  dtype: np.dtype
  offset: int  # elements into the root storage (legacy views), else 0
  numel: int


class _TensorRef(NamedTuple):
  storage: _StorageRef
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks  # inference only
  ok = (isinstance(storage, _StorageRef) and isinstance(storage_offset, int) and storage_offset >= 0
        and isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
        and all(isinstance(n, int) and n >= 0 for n in size + stride) and not metadata)
  if not ok:
    raise _TorchFileError(f'unsupported tensor record (offset {storage_offset!r}, size '
                          f'{size!r}, stride {stride!r}, metadata {metadata!r})')
  return _TensorRef(storage, storage_offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the names a torch state dict needs (see above); refuses every other global."""

  def __init__(self, file, source: str, storage_ref=None):
    super().__init__(file)
    self._source = source
    self._storage_ref = storage_ref

  def find_class(self, module, name):
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
      return lambda *args: _rebuild_tensor_v2(*args)  # a fresh object: BUILD cannot alter ours
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name, _STORAGE_DTYPES[name])
    raise _TorchFileError(f'load_torch_state_dict: {self._source} refers to {module}.{name}; only '
                          'tensors and dicts are read (an untrusted pickle could run code)')

  def persistent_load(self, pid):
    if self._storage_ref is None or not (isinstance(pid, tuple) and pid and pid[0] == 'storage'):
      raise _TorchFileError(f'load_torch_state_dict: {self._source} has an unsupported persistent '
                            f'id {str(pid)[:80]}')
    return self._storage_ref(pid)


def _storage_type(pid, source) -> np.dtype:
  if len(pid) < 5 or not isinstance(pid[1], _StorageType) or not isinstance(pid[4], int):
    raise _TorchFileError(f'load_torch_state_dict: {source} has a malformed storage id {pid!r}')
  return pid[1].dtype


def _read_zip(data: bytes, source: str):
  with zipfile.ZipFile(io.BytesIO(data)) as z:
    names = z.namelist()
    pickles = [n for n in names if n.endswith('/data.pkl') and n.count('/') == 1]
    if len(pickles) != 1:
      raise _TorchFileError(f'load_torch_state_dict: {source} is a zip but not a torch.save '
                            f'archive (no single <name>/data.pkl; has {names[:3]})')
    prefix = pickles[0][:-len('data.pkl')]
    order = '<'
    if prefix + 'byteorder' in names:
      order = {b'little': '<', b'big': '>'}.get(z.read(prefix + 'byteorder'))
      if order is None:
        raise _TorchFileError(f'load_torch_state_dict: {source} has byteorder '
                              f'{z.read(prefix + "byteorder")!r}')
    storages = {}

    def storage_ref(pid):
      dtype = _storage_type(pid, source)
      if len(pid) != 5:
        raise _TorchFileError(f'load_torch_state_dict: {source} has a malformed storage id {pid!r}')
      key, numel = str(pid[2]), pid[4]
      if key not in storages:
        record = f'{prefix}data/{key}'
        if record not in names:
          raise _TorchFileError(f'load_torch_state_dict: {source} lacks the record {record}')
        raw = z.read(record)
        if len(raw) != numel * dtype.itemsize:
          raise _TorchFileError(f'load_torch_state_dict: {source}: {record} has {len(raw)} bytes, '
                                f'expected {numel} x {dtype.itemsize}')
        storages[key] = np.frombuffer(raw, dtype.newbyteorder(order))
      return _StorageRef(key, dtype, 0, numel)

    obj = _RestrictedUnpickler(io.BytesIO(z.read(pickles[0])), source, storage_ref).load()
  return obj, storages


def _read_legacy(data: bytes, source: str):
  f = io.BytesIO(data)
  try:
    magic = _RestrictedUnpickler(f, source).load()
  except Exception as e:  # pylint: disable=broad-except  # not a pickle at all
    raise _TorchFileError(f'load_torch_state_dict: {source} is neither a torch.save zip archive '
                          f'nor the legacy format ({_summary(e)})') from None
  if magic != _LEGACY_MAGIC:
    raise _TorchFileError(f'load_torch_state_dict: {source} is not a torch.save file (bad magic '
                          'number)')
  protocol = _RestrictedUnpickler(f, source).load()
  if protocol != _LEGACY_PROTOCOL:
    raise _TorchFileError(f'load_torch_state_dict: {source} has legacy protocol {protocol!r}, '
                          f'expected {_LEGACY_PROTOCOL}')
  sys_info = _RestrictedUnpickler(f, source).load()
  order = '<' if not isinstance(sys_info, dict) or sys_info.get('little_endian', True) else '>'
  dtypes = {}  # root key -> dtype; storages are read after the object

  def storage_ref(pid):
    dtype = _storage_type(pid, source)
    if len(pid) != 6:
      raise _TorchFileError(f'load_torch_state_dict: {source} has a malformed storage id {pid!r}')
    key, numel, view = str(pid[2]), pid[4], pid[5]
    dtypes[key] = dtype
    if view is None:
      return _StorageRef(key, dtype, 0, numel)
    _, view_offset, view_numel = view
    return _StorageRef(key, dtype, int(view_offset), int(view_numel))

  obj = _RestrictedUnpickler(f, source, storage_ref).load()
  keys = _RestrictedUnpickler(f, source).load()
  storages = {}
  for key in keys:
    header = f.read(8)
    if len(header) != 8 or key not in dtypes:
      raise _TorchFileError(f'load_torch_state_dict: {source} is truncated or has an unknown '
                            f'storage {key!r}')
    numel = struct.unpack(order + 'q', header)[0]
    raw = f.read(numel * dtypes[key].itemsize)
    if len(raw) != numel * dtypes[key].itemsize:
      raise _TorchFileError(f'load_torch_state_dict: {source} is truncated in storage {key!r}')
    storages[key] = np.frombuffer(raw, dtypes[key].newbyteorder(order))
  return obj, storages


def _summary(e: Exception) -> str:
  text = ' '.join(str(e).split())  # one line, whatever the message
  return f'{type(e).__name__}: {text[:120]}'


def _materialise(ref: _TensorRef, storages, name: str, source: str) -> np.ndarray:
  if ref.storage.key not in storages:
    raise _TorchFileError(f'load_torch_state_dict: {source}: {name!r} uses a missing storage')
  root = storages[ref.storage.key]
  flat = root[ref.storage.offset:ref.storage.offset + ref.storage.numel]
  if 0 in ref.size:
    return np.zeros(ref.size, ref.storage.dtype)
  last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
  if last >= len(flat):
    raise _TorchFileError(f'load_torch_state_dict: {source}: {name!r} (size {ref.size}, stride '
                          f'{ref.stride}) overruns its storage of {len(flat)} elements')
  view = np.lib.stride_tricks.as_strided(flat[ref.offset:], ref.size,
                                         [s * flat.itemsize for s in ref.stride], writeable=False)
  return np.array(view, dtype=ref.storage.dtype)  # a copy in native byte order


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a `torch.save`d state dict (zip or legacy format) as name -> numpy array, without
  torch; refuses pickles that refer to anything but tensors, storages and `OrderedDict`."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise _TorchFileError(f'load_torch_state_dict: cannot read {path}: {e.strerror or e}') from None
  try:
    if data[:4] == b'PK\x03\x04':
      obj, storages = _read_zip(data, path)
    else:
      obj, storages = _read_legacy(data, path)
  except _TorchFileError as e:
    if not str(e).startswith('load_torch_state_dict:'):  # raised where the path is not known
      raise _TorchFileError(f'load_torch_state_dict: {path}: {e}') from None
    raise
  except Exception as e:  # pylint: disable=broad-except
    # A damaged pickle or zip surfaces as UnpicklingError, EOFError, BadZipFile, TypeError, ...
    raise _TorchFileError(f'load_torch_state_dict: {path} is damaged ({_summary(e)})') from None
  if not isinstance(obj, dict):
    raise _TorchFileError(f'load_torch_state_dict: {path} holds a {type(obj).__name__}, not a '
                          'state dict')
  out = {}
  for name, value in obj.items():
    if not isinstance(value, _TensorRef):
      raise _TorchFileError(f'load_torch_state_dict: {path}: {name!r} is a {type(value).__name__}, '
                            'not a tensor')
    out[str(name)] = _materialise(value, storages, name, path)
  return out


class _PickleWriter:
  """Emits the protocol-2 opcodes `torch.save` writes for a dict of tensors (written by hand: the
  standard pickler would need torch importable to name `torch._utils._rebuild_tensor_v2`)."""

  def __init__(self):
    self.out = bytearray(b'\x80\x02')  # PROTO 2

  def global_(self, module: str, name: str):
    self.out += b'c' + f'{module}\n{name}\n'.encode()

  def str_(self, s: str):
    b = s.encode('utf-8')
    self.out += b'X' + struct.pack('<I', len(b)) + b

  def int_(self, n: int):
    if 0 <= n < 256:
      self.out += b'K' + bytes([n])
    elif 0 <= n < 65536:
      self.out += b'M' + struct.pack('<H', n)
    elif -2**31 <= n < 2**31:
      self.out += b'J' + struct.pack('<i', n)
    else:
      b = n.to_bytes((n.bit_length() + 8) // 8, 'little', signed=True)
      self.out += b'\x8a' + bytes([len(b)]) + b  # LONG1

  def tuple_(self, items):
    """`items`: callables that each emit one element."""
    if not items:
      self.out += b')'
      return
    if len(items) > 3:
      self.out += b'('
    for emit in items:
      emit()
    self.out += {1: b'\x85', 2: b'\x86', 3: b'\x87'}.get(len(items), b't')

  def empty_ordered_dict(self):
    self.global_('collections', 'OrderedDict')
    self.out += b')R'  # EMPTY_TUPLE, REDUCE

  def tensor(self, storage_id: tuple, shape, strides):
    self.global_('torch._utils', '_rebuild_tensor_v2')
    self.out += b'('  # MARK: the argument tuple
    self.tuple_([functools.partial(self._pid_item, x) for x in storage_id])
    self.out += b'Q'  # BINPERSID
    self.int_(0)  # storage_offset
    self.tuple_([functools.partial(self.int_, n) for n in shape])
    self.tuple_([functools.partial(self.int_, n) for n in strides])
    self.out += b'\x89'  # requires_grad = False
    self.empty_ordered_dict()  # backward_hooks
    self.out += b'tR'  # TUPLE, REDUCE

  def _pid_item(self, x):
    if isinstance(x, _StorageType):
      self.global_('torch', x.name)
    elif x is None:
      self.out += b'N'
    elif isinstance(x, str):
      self.str_(x)
    else:
      self.int_(x)


def save_torch_state_dict(path: str, state_dict: Mapping[str, np.ndarray], *,
                          legacy: bool = False) -> None:
  """Writes name -> array as `torch.save(OrderedDict of CPU tensors)` does, for `torch.load`.

  The zip layout of current torch (records `<stem>/data.pkl`, `.format_version`,
  `.storage_alignment`, `byteorder`, `data/<i>` aligned to 64 bytes, `version` = 3), or with
  `legacy=True` the format torch wrote before 1.6 (`_use_new_zipfile_serialization=False`).
  """
  arrays = collections.OrderedDict()
  for name, value in state_dict.items():
    a = np.asarray(value)
    if a.dtype not in _STORAGE_NAMES:
      raise ValueError(f'save_torch_state_dict: {name!r} has dtype {a.dtype}, which has no torch '
                       'storage type')
    arrays[name] = np.asarray(a, a.dtype.newbyteorder('<'), order='C')  # keeps 0-d arrays 0-d
  keys = [str(i) for i in range(len(arrays))]
  pickler = _PickleWriter()
  pickler.empty_ordered_dict()
  pickler.out += b'('  # MARK for SETITEMS
  for key, (name, a) in zip(keys, arrays.items(), strict=True):
    storage_type = _StorageType(_STORAGE_NAMES[a.dtype.newbyteorder('=')], a.dtype)
    storage_id = ('storage', storage_type, key, 'cpu', a.size) + ((None,) if legacy else ())
    strides = tuple(s // a.itemsize for s in a.strides)
    pickler.str_(name)
    pickler.tensor(storage_id, a.shape, strides)
  pickler.out += b'u.'  # SETITEMS, STOP
  if legacy:
    _write_legacy(path, bytes(pickler.out), keys, list(arrays.values()))
  else:
    _write_zip(path, bytes(pickler.out), keys, list(arrays.values()))


def _write_zip(path, data_pkl: bytes, keys, arrays):
  stem = os.path.splitext(os.path.basename(path))[0] or 'archive'
  records = [('data.pkl', data_pkl), ('.format_version', b'1'),
             ('.storage_alignment', str(_ZIP_ALIGNMENT).encode()), ('byteorder', b'little')]
  records += [(f'data/{k}', a.tobytes()) for k, a in zip(keys, arrays, strict=True)]
  records += [('version', b'3\n')]
  with open(path, 'wb') as f, zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED) as z:
    for name, payload in records:
      info = zipfile.ZipInfo(f'{stem}/{name}', date_time=(1980, 1, 1, 0, 0, 0))
      header = 30 + len(info.filename.encode()) + 4  # local header + the 'FB' extra's header
      pad = -(f.tell() + header) % _ZIP_ALIGNMENT
      info.extra = b'FB' + struct.pack('<H', pad) + b'Z' * pad
      z.writestr(info, payload)


def _write_legacy(path, data_pkl: bytes, keys, arrays):
  sys_info = {'protocol_version': _LEGACY_PROTOCOL, 'little_endian': True,
              'type_sizes': {'short': 2, 'int': 4, 'long': 8}}
  with open(path, 'wb') as f:
    for obj in (_LEGACY_MAGIC, _LEGACY_PROTOCOL, sys_info):
      pickle.dump(obj, f, protocol=2)
    f.write(data_pkl)
    pickle.dump(sorted(keys), f, protocol=2)
    for key in sorted(keys):
      a = arrays[int(key)]
      f.write(struct.pack('<q', a.size))
      f.write(a.tobytes())
