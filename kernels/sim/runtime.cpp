// Placeholder runtime until the simulator lands: every kernel is unknown.
#include <cstddef>
#include <cstdint>
extern "C" int prm_sim_launch(const char*, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t, void**, char*, size_t) { return 1; }
