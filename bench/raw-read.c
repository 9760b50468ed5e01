/*
 * raw-read: the floor under `cowtree-img bench` reads of a backing chain. It makes the same
 * sequential reads with plain pread(2), from raw files laid out as the chain's layers: with N
 * files, 64 KiB cluster c of the disk is in file c % N at (c / N) * 64 KiB, as in the bench's
 * chains, where layer c % N allocates cluster c. One file is the depth-1 case. The only work
 * left is the kernel's, so its depth curve is what no image format can beat: every file a
 * read touches costs the kernel its own file, inode and page-cache lookups.
 *
 * usage: raw-read COUNT SIZE FILE...   (COUNT reads of SIZE bytes; prints the time as
 * `qemu-img bench` does: "Run completed in X seconds.")
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define CLUSTER 65536u

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: raw-read COUNT SIZE FILE...\n");
        return 2;
    }
    uint64_t count = strtoull(argv[1], NULL, 0), size = strtoull(argv[2], NULL, 0);
    int nfiles = argc - 3;
    int *fds = calloc((size_t)nfiles, sizeof(*fds));
    uint64_t disk = 0;
    if (!fds || size == 0 || size > CLUSTER || CLUSTER % size) {
        fprintf(stderr, "raw-read: SIZE must divide %u\n", CLUSTER);
        return 2;
    }
    for (int i = 0; i < nfiles; i++) {
        struct stat st;
        fds[i] = open(argv[3 + i], O_RDONLY);
        if (fds[i] < 0 || fstat(fds[i], &st) < 0) {
            perror(argv[3 + i]);
            return 1;
        }
        disk += (uint64_t)st.st_size / CLUSTER * CLUSTER;
    }
    if (disk == 0) {
        fprintf(stderr, "raw-read: the files hold no whole cluster\n");
        return 1;
    }
    uint8_t *buf = aligned_alloc(4096, CLUSTER);
    if (!buf) {
        return 1;
    }
    memset(buf, 0, CLUSTER);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    uint64_t off = 0;
    for (uint64_t i = 0; i < count; i++) {
        if (off + size > disk) {
            off = 0;
        }
        uint64_t c = off / CLUSTER;
        int f = (int)(c % (uint64_t)nfiles);
        uint64_t at = c / (uint64_t)nfiles * CLUSTER + off % CLUSTER;
        if (pread(fds[f], buf, size, (off_t)at) != (ssize_t)size) {
            fprintf(stderr, "raw-read: short read of %s at %" PRIu64 "\n", argv[3 + f], at);
            return 1;
        }
        off += size;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("Run completed in %3.3f seconds.\n", secs);
    return 0;
}
