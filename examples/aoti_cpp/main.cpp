// Run an AOTInductor package (.pt2) from C++ with only libtorch: no Python, no dbllm_compile.
//
//   aoti_run PACKAGE ids B T VOCAB      int64 token ids [B, T], ids[b, t] = (b * T + t) * 7 % VOCAB
//   aoti_run PACKAGE float B K DTYPE     activations [B, K], x[b, k] = ((b * K + k) % 17 - 8) / 8,
//                                        DTYPE float32 | float16 | bfloat16
//
// The device comes from the package metadata (AOTI_DEVICE_KEY). Inputs are deterministic so the
// Python side (benchmarks/gpu_aoti_check.py) can compute the same call and compare. Prints the
// package metadata, then one line per output: shape, sum (float64) and the first values.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <iostream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 6) {
    std::cerr << "usage: " << argv[0] << " PACKAGE ids B T VOCAB | PACKAGE float B K DTYPE\n";
    return 2;
  }
  const std::string package = argv[1], kind = argv[2];
  const int64_t rows = std::stoll(argv[3]), cols = std::stoll(argv[4]);
  try {
    torch::inductor::AOTIModelPackageLoader loader(package);
    auto metadata = loader.get_metadata();
    for (const auto& kv : metadata) std::cout << "metadata " << kv.first << " = " << kv.second << "\n";
    const std::string device_key = metadata.count("AOTI_DEVICE_KEY") ? metadata["AOTI_DEVICE_KEY"] : "cpu";
    const torch::Device device(device_key == "cuda" ? torch::kCUDA : torch::kCPU);

    torch::Tensor input;
    if (kind == "ids") {
      const int64_t vocab = std::stoll(argv[5]);
      input = (torch::arange(rows * cols, torch::kLong) * 7).remainder(vocab).reshape({rows, cols});
    } else {
      const std::string dtype = argv[5];
      const auto scalar = dtype == "float16" ? torch::kHalf : dtype == "bfloat16" ? torch::kBFloat16 : torch::kFloat;
      input = ((torch::arange(rows * cols, torch::kLong).remainder(17) - 8).to(torch::kFloat) / 8.0)
                  .reshape({rows, cols}).to(scalar);
    }
    std::vector<torch::Tensor> inputs = {input.to(device)};
    std::vector<torch::Tensor> outputs = loader.run(inputs);
    for (size_t i = 0; i < outputs.size(); ++i) {
      const auto out = outputs[i].to(torch::kCPU).to(torch::kDouble);
      std::cout << "output " << i << " shape " << outputs[i].sizes() << " sum " << out.sum().item<double>()
                << " first";
      const auto flat = out.flatten();
      for (int64_t j = 0; j < std::min<int64_t>(4, flat.numel()); ++j) std::cout << " " << flat[j].item<double>();
      std::cout << "\n";
    }
  } catch (const std::exception& err) {
    std::cerr << "aoti_run: " << err.what() << "\n";
    return 1;
  }
  return 0;
}
