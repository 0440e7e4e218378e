// RoPE's sine and cosine (sincos_of_angle in kernels/rope.cu) against double precision, on the CPU:
// random angles over ranges up to 2e6 radians and the angles a model forms (position times
// frequency, in f32, for 128-wide heads at two RoPE bases), each within 1.2e-7 (an f32 ulp at 1) of
// the sine and cosine of the same f32 angle. tests/kernel_host.rs compiles and runs it; it prints one
// line per failure and exits non-zero if there was any.
#include <cmath>
#include <cstdio>
#include <random>
#include <string>

#include "../../kernels/rope.cu"
#include "tally.h"

namespace {

constexpr double kTolerance = 1.2e-7;
double worst = 0.0;

void check_angle(float angle) {
    float s, c;
    sincos_of_angle(angle, &s, &c);
    const double es = std::fabs(s - std::sin((double)angle)), ec = std::fabs(c - std::cos((double)angle));
    worst = std::fmax(worst, std::fmax(es, ec));
    if (tally::failed(es <= kTolerance && ec <= kTolerance))
        std::printf("FAIL angle %.9g: sin %.9g (error %.3g), cos %.9g (error %.3g)\n", angle, s, es, c, ec);
}

}  // namespace

int main(int argc, char** argv) {
    const unsigned seed = argc > 1 ? static_cast<unsigned>(std::stoul(argv[1])) : std::random_device{}();
    std::printf("rope host check, seed %u\n", seed);
    std::mt19937 rng(seed);
    check_angle(0.0f);
    for (float range : {4.0f, 100.0f, 1e4f, 2e5f, 2e6f}) {
        std::uniform_real_distribution<float> angle(-range, range);
        for (int i = 0; i < 200000; ++i) check_angle(angle(rng));
    }
    for (float base : {10000.0f, 500000.0f})
        for (int p = 0; p < 131072; p += 13)
            for (int i = 0; i < 64; ++i) check_angle((float)p * (1.0f / std::pow(base, 2.0f * i / 128.0f)));
    std::printf("largest error %.3g\n", worst);
    return tally::finish();
}
