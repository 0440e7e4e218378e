// The tally of the host checks in this folder: every check counts, the first 40 failures print a
// line each, and finish() prints "N checks, M failed" (tests/kernel_host.rs looks for " 0 failed")
// and gives the exit status.
#pragma once
#include <cstdio>
#include <string>

namespace tally {

inline int checks = 0;
inline int failures = 0;

// Counts a check; true when it failed and its line should print.
inline bool failed(bool ok) {
    ++checks;
    return !ok && ++failures <= 40;
}

inline void check(bool ok, const std::string& what) {
    if (failed(ok)) std::printf("FAIL %s\n", what.c_str());
}

inline int finish(const char* label = "") {
    std::printf("%s%d checks, %d failed\n", label, checks, failures);
    return failures == 0 ? 0 : 1;
}

}  // namespace tally
