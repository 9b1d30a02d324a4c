// Neighbor padding (Algorithm 1 of the paper) as a PyTorch operation with a compiled CPU kernel.
//
// Built and loaded by captum_layermask/core/native.py. The PyTorch code of primitives.py computes the same values
// (to float rounding: here each filled cell sums its known neighbours in one expression) and runs wherever this
// operation does not (no C++ compiler, autograd, CUDA, other dtypes).
//
// The rings depend on the mask only, so the cells of each ring and their known neighbours are found once per
// image; every channel of that image is then padded by visiting those cells only, instead of eager PyTorch's
// dense passes over whole planes. The work runs on PyTorch's own intra-op threads (at::parallel_for).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr uint8_t kNotReached = 255;

// The ring cells of one image, innermost ring first: each cell's index, the indices of its 3x3 neighbours known
// before its ring (the cell's own index in place of the others: it holds x * 0 until it is filled, so it adds
// nothing, or keeps a NaN there as the PyTorch code does), and the number of known neighbours.
struct RingCells {
  std::vector<int32_t> cells;
  std::vector<int32_t> neighbours;  // 9 per cell
  std::vector<uint8_t> counts;
};

// Fills `level` (height * width bytes: 0 visible, r on ring r, 255 not reached) from a mask (visible where > 0)
// and returns the ring cells. Each ring first marks the cells with a known cell in their 3x3 window (a row pass
// and a column pass over bytes, which vectorise), then lists the neighbours of the unknown ones among them.
template <typename M>
RingCells find_rings(const M* mask, int64_t height, int64_t width, int64_t rings, uint8_t* level) {
  RingCells found;
  const int64_t size = height * width;
  std::vector<uint8_t> known(size), across(size), near(size);
  for (int64_t i = 0; i < size; ++i) {
    known[i] = mask[i] > M(0);
    level[i] = known[i] ? 0 : kNotReached;
  }
  for (int64_t ring = 1; ring <= rings; ++ring) {
    for (int64_t y = 0; y < height; ++y) {
      const uint8_t* row = known.data() + y * width;
      uint8_t* out = across.data() + y * width;
      out[0] = row[0] | (width > 1 ? row[1] : 0);
      for (int64_t x = 1; x + 1 < width; ++x) out[x] = row[x - 1] | row[x] | row[x + 1];
      if (width > 1) out[width - 1] = row[width - 2] | row[width - 1];
    }
    for (int64_t y = 0; y < height; ++y) {
      const uint8_t* above = across.data() + (y > 0 ? y - 1 : y) * width;
      const uint8_t* here = across.data() + y * width;
      const uint8_t* below = across.data() + (y + 1 < height ? y + 1 : y) * width;
      uint8_t* out = near.data() + y * width;
      for (int64_t x = 0; x < width; ++x) out[x] = (above[x] | here[x] | below[x]) & !known[y * width + x];
    }
    const size_t first = found.cells.size();
    for (int64_t cell = 0; cell < size; ++cell) {
      if (!near[cell]) continue;
      const int64_t y = cell / width, x = cell % width;
      int32_t neighbours[9];
      int count = 0;
      for (int dy = -1; dy <= 1; ++dy) {
        for (int dx = -1; dx <= 1; ++dx) {
          const int64_t ny = y + dy, nx = x + dx, neighbour = ny * width + nx;
          const bool is_known = ny >= 0 && ny < height && nx >= 0 && nx < width && known[neighbour];
          neighbours[(dy + 1) * 3 + dx + 1] = static_cast<int32_t>(is_known ? neighbour : cell);
          count += is_known;
        }
      }
      found.cells.push_back(static_cast<int32_t>(cell));
      found.neighbours.insert(found.neighbours.end(), neighbours, neighbours + 9);
      found.counts.push_back(static_cast<uint8_t>(count));
    }
    if (found.cells.size() == first) break;
    for (size_t k = first; k < found.cells.size(); ++k) {
      known[found.cells[k]] = 1;
      level[found.cells[k]] = static_cast<uint8_t>(ring);
    }
  }
  return found;
}

// 1 / k for the k known neighbours of a ring cell (k = 0 never occurs: such a cell is not a ring cell).
template <typename T>
const T* reciprocals() {
  static const T table[10] = {0, 1, T(1) / 2, T(1) / 3, T(1) / 4, T(1) / 5, T(1) / 6, T(1) / 7, T(1) / 8, T(1) / 9};
  return table;
}

// Channels `first` to `last - 1` of one image in (channels, height * width) memory, a few planes at a time so
// that each ring cell's neighbour list is read once for all of them. `level` is 0 on the visible cells. With
// out == x the padding is done in place: the ring cells are overwritten and the other cells keep their values.
template <typename T>
void pad_planes(const T* x, T* out, int64_t size, int64_t first, int64_t last, const uint8_t* level,
                const RingCells& rings) {
  constexpr int64_t kPlanes = 8;
  const T* reciprocal = reciprocals<T>();
  for (int64_t block = first; block < last; block += kPlanes) {
    const int64_t planes = std::min(kPlanes, last - block);
    for (int64_t plane = 0; plane < planes; ++plane) {
      const T* source = x + (block + plane) * size;
      T* target = out + (block + plane) * size;
      if (source != target) {
        for (int64_t i = 0; i < size; ++i) target[i] = source[i] * T(level[i] == 0);
      } else {  // in place: only the ring cells are cleared, the other removed cells keep their values
        for (const int32_t cell : rings.cells) target[cell] = T(0);
      }
    }
    for (size_t k = 0; k < rings.cells.size(); ++k) {
      const int32_t* known = &rings.neighbours[9 * k];
      const T weight = reciprocal[rings.counts[k]];
      T* target = out + block * size;
      for (int64_t plane = 0; plane < planes; ++plane, target += size) {
        const T sum = target[known[0]] + target[known[1]] + target[known[2]] + target[known[3]] +
                      target[known[4]] + target[known[5]] + target[known[6]] + target[known[7]] + target[known[8]];
        target[rings.cells[k]] += sum * weight;
      }
    }
  }
}

// The same in channels-last memory, (height * width, channels): each ring cell's update runs over contiguous
// channels, which the compiler vectorises. `zeros` holds last - first zeros, read for the neighbours not known
// (so that the target row never overlaps a row it reads).
template <typename T>
void pad_channels_last(const T* x, T* out, int64_t size, int64_t channels, int64_t first, int64_t last,
                       const uint8_t* level, const RingCells& rings, const T* zeros) {
  const T* reciprocal = reciprocals<T>();
  const int64_t span = last - first;
  if (x != out) {
    for (int64_t i = 0; i < size; ++i) {
      const T* source = x + i * channels + first;
      T* target = out + i * channels + first;
      const T scale = T(level[i] == 0);
      for (int64_t c = 0; c < span; ++c) target[c] = source[c] * scale;
    }
  } else {
    for (const int32_t cell : rings.cells) std::fill_n(out + cell * channels + first, span, T(0));
  }
  for (size_t k = 0; k < rings.cells.size(); ++k) {
    const int32_t* known = &rings.neighbours[9 * k];
    const int64_t cell = rings.cells[k];
    const T* rows[9];
    for (int b = 0; b < 9; ++b) rows[b] = known[b] != cell ? out + known[b] * channels + first : zeros;
    T* __restrict__ target = out + cell * channels + first;
    const T weight = reciprocal[rings.counts[k]];
    for (int64_t c = 0; c < span; ++c) {
      target[c] += (rows[0][c] + rows[1][c] + rows[2][c] + rows[3][c] + rows[4][c] + rows[5][c] + rows[6][c] +
                    rows[7][c] + rows[8][c]) * weight;
    }
  }
}

// Whether each cell of every `stride_h`-th row and `stride_w`-th column is within `grow` rings of the visible
// cells, as 0/1 in `reached`'s dtype: a convolution's output mask (section 3.2) from the levels.
void write_reached(const at::Tensor& levels, int64_t grow, int64_t stride_h, int64_t stride_w, at::Tensor& reached) {
  const int64_t images = levels.size(0), height = levels.size(2), width = levels.size(3);
  const int64_t rows = reached.size(2), columns = reached.size(3);
  const uint8_t* level = levels.data_ptr<uint8_t>();
  const int64_t limit = std::min<int64_t>(grow, kNotReached - 1);  // cells no ring reaches stay removed
  AT_DISPATCH_FLOATING_TYPES_AND(at::kByte, reached.scalar_type(), "neighbor_pad_reached", [&] {
    scalar_t* out = reached.data_ptr<scalar_t>();
    for (int64_t image = 0; image < images; ++image) {
      for (int64_t y = 0; y < rows; ++y) {
        const uint8_t* row = level + (image * height + y * stride_h) * width;
        scalar_t* target = out + (image * rows + y) * columns;
        for (int64_t x = 0; x < columns; ++x) target[x] = scalar_t(row[x * stride_w] <= limit);
      }
    }
  });
}

// Pads x (N, C, H, W; float32/float64, contiguous or channels-last) into `out` (x's shape and memory format; x
// itself to pad in place) from a mask (N or 1, 1, H, W; visible where > 0; float32, float64, bool or uint8).
// Returns the mask grown by `grow` rings and subsampled by the stride (the mask's dtype; shape (N or 1, 1,
// ceil(H / stride_h), ceil(W / stride_w))).
at::Tensor pad_into(const at::Tensor& x, at::Tensor& out, const at::Tensor& mask_in, int64_t rings, int64_t grow,
                    int64_t stride_h, int64_t stride_w) {
  TORCH_CHECK(x.dim() == 4 && mask_in.dim() == 4, "neighbor_pad: 4-D activations and mask expected");
  TORCH_CHECK(rings >= 0 && rings < kNotReached, "neighbor_pad: rings must be in [0, 254]");
  TORCH_CHECK(grow >= 0 && stride_h >= 1 && stride_w >= 1, "neighbor_pad: grow >= 0 and strides >= 1 expected");
  const bool channels_last = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(x.is_contiguous() || channels_last, "neighbor_pad: contiguous or channels-last activations expected");
  const bool boolean = mask_in.scalar_type() == at::kBool;
  const at::Tensor mask = boolean ? mask_in.contiguous().view(at::kByte) : mask_in.contiguous();
  const int64_t batch = x.size(0), channels = x.size(1), size = x.size(2) * x.size(3);
  const int64_t images = mask.size(0);
  at::Tensor levels = at::empty(mask.sizes(), mask.options().dtype(at::kByte));
  std::vector<RingCells> found(images);
  uint8_t* level_data = levels.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kByte, mask.scalar_type(), "neighbor_pad_rings", [&] {
    const scalar_t* mask_data = mask.data_ptr<scalar_t>();
    at::parallel_for(0, images, 1, [&](int64_t begin, int64_t end) {
      for (int64_t image = begin; image < end; ++image) {
        found[image] = find_rings(mask_data + image * size, x.size(2), x.size(3), rings, level_data + image * size);
      }
    });
  });
  at::Tensor reached = at::empty({images, 1, (x.size(2) + stride_h - 1) / stride_h,
                                  (x.size(3) + stride_w - 1) / stride_w}, mask.options());
  write_reached(levels, grow, stride_h, stride_w, reached);
  const int64_t planes = batch * channels;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(size, 1));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "neighbor_pad_cpu", [&] {
    const scalar_t* source = x.data_ptr<scalar_t>();
    scalar_t* target = out.data_ptr<scalar_t>();
    const at::Tensor zeros = at::zeros({channels}, x.options().memory_format(at::MemoryFormat::Contiguous));
    at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
      while (begin < end) {
        const int64_t image = begin / channels, first = begin % channels;
        const int64_t last = std::min(end - image * channels, channels);
        const int64_t ring = images > 1 ? image : 0;
        const int64_t offset = image * channels * size;
        if (channels_last) {
          pad_channels_last(source + offset, target + offset, size, channels, first, last,
                            level_data + ring * size, found[ring], zeros.data_ptr<scalar_t>());
        } else {
          pad_planes(source + offset, target + offset, size, first, last, level_data + ring * size, found[ring]);
        }
        begin = image * channels + last;
      }
    });
  });
  return boolean ? reached.view(at::kBool) : reached;
}

// The padded copy of x (x's memory format; a non-contiguous x is copied first) and the grown mask.
std::tuple<at::Tensor, at::Tensor> neighbor_pad_cpu(const at::Tensor& x_in, const at::Tensor& mask, int64_t rings,
                                                    int64_t grow, int64_t stride_h, int64_t stride_w) {
  const bool channels_last = !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = channels_last ? x_in : x_in.contiguous();
  at::Tensor out = at::empty_like(x);
  at::Tensor reached = pad_into(x, out, mask, rings, grow, stride_h, stride_w);
  return {out, reached};
}

// x padded in place (the ring cells overwritten, the other cells as they were), and the grown mask.
at::Tensor neighbor_pad_inplace_cpu(at::Tensor& x, const at::Tensor& mask, int64_t rings, int64_t grow,
                                    int64_t stride_h, int64_t stride_w) {
  return pad_into(x, x, mask, rings, grow, stride_h, stride_w);
}

}  // namespace

TORCH_LIBRARY(captum_layermask_native, m) {
  m.def(
      "neighbor_pad(Tensor x, Tensor mask, int rings, int grow, int stride_h, int stride_w) -> (Tensor, Tensor)");
  m.def("neighbor_pad_(Tensor(a!) x, Tensor mask, int rings, int grow, int stride_h, int stride_w) -> Tensor");
}

TORCH_LIBRARY_IMPL(captum_layermask_native, CPU, m) {
  m.impl("neighbor_pad", &neighbor_pad_cpu);
  m.impl("neighbor_pad_", &neighbor_pad_inplace_cpu);
}
