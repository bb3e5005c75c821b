// vllm-forge: a small C++ target that exercises the compiler launcher (compile cache) path.
#include <cstdio>
#include <numeric>
#include <vector>

int main() {
  std::vector<int> v(512);
  std::iota(v.begin(), v.end(), 1);
  std::printf("%d\n", std::accumulate(v.begin(), v.end(), 0));
  return 0;
}
