/* Fault injection: rule parsing and the k-th-call semantics the crash driver relies on. */
#include <errno.h>
#include <string.h>

#include "io/io.h"
#include "t.h"

int main(void)
{
    T_CHECK(ct_fault_configure("write:0:eio") == -EINVAL, "k must be >= 1");
    T_CHECK(ct_fault_configure("bogus:1:eio") == -EINVAL, "unknown op");
    T_CHECK(ct_fault_configure("write:1:explode") == -EINVAL, "unknown action");
    T_CHECK(ct_fault_configure("write:3:eio,flush:2:enospc") == 0, "valid spec");
    struct ct_file *f;
    T_ASSERT(ct_file_open_mem(&f, "", 0, true) == 0, "mem file");
    char b[4] = "abc";
    T_CHECK(ct_file_pwrite(f, b, 3, 0) == 0, "write 1");
    T_CHECK(ct_file_pwrite(f, b, 3, 3) == 0, "write 2");
    T_CHECK(ct_file_pwrite(f, b, 3, 6) == -EIO, "write 3 fails with EIO");
    T_CHECK(ct_file_pwrite(f, b, 3, 9) == 0, "write 4 succeeds again");
    T_CHECK(ct_file_flush(f) == 0, "flush 1");
    T_CHECK(ct_file_flush(f) == -ENOSPC, "flush 2 fails with ENOSPC");
    uint64_t w, fl;
    ct_fault_counts(&w, &fl);
    T_CHECK(w == 4 && fl == 2, "counts w=%llu f=%llu", (unsigned long long)w,
            (unsigned long long)fl);
    char rb[12];
    T_CHECK(ct_file_pread(f, rb, 12, 0) == 0 && memcmp(rb, "abcabc", 6) == 0 && rb[6] == 0,
            "failed write left no bytes");
    T_CHECK(ct_file_pread(f, rb, 12, 100) == 0 && rb[0] == 0, "read past EOF is zeros");
    ct_file_close(f);
    ct_fault_configure(NULL);
    return t_done();
}
