/*
 * raw-read: the floor under `cowtree-img bench` reads of a backing chain. It makes the same
 * sequential reads with plain pread(2), of the same bytes in the same files: a map (from
 * `qemu-img map --output=json` of the chain) says for each 64 KiB cluster of the disk which
 * layer's file holds it and where. What is left is the kernel's work and nothing of the image
 * format: no metadata lookups, no chain. Its curve against depth is the best any format can
 * do with those files in that page cache.
 *
 * usage: raw-read COUNT SIZE MAP FILE...
 *   COUNT reads of SIZE bytes (SIZE divides 64 KiB), from offset 0 on, wrapping at the end
 *   of the disk; MAP has one line per cluster of the disk, in order: "LAYER OFFSET" (LAYER
 *   indexes FILE..., OFFSET is where that file holds the cluster) or "- -" for a cluster that
 *   reads as zeros. Prints the time as `qemu-img bench` does: "Run completed in X seconds."
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define CLUSTER 65536u

struct where {
    int fd; /* -1: zeros */
    uint64_t off;
};

static struct where *load_map(const char *path, const int *fds, int nfiles, uint64_t *nclusters)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        perror(path);
        return NULL;
    }
    size_t n = 0, cap = 1024;
    struct where *m = malloc(cap * sizeof(*m));
    char a[32], b[32];
    while (m && fscanf(f, "%31s %31s", a, b) == 2) {
        if (n == cap && !(m = realloc(m, (cap *= 2) * sizeof(*m)))) {
            break;
        }
        if (strcmp(a, "-") == 0) {
            m[n].fd = -1;
            m[n].off = 0;
        } else {
            int layer = atoi(a);
            if (layer < 0 || layer >= nfiles) {
                fprintf(stderr, "raw-read: %s: layer %d of cluster %zu is not given\n", path, layer,
                        n);
                free(m);
                fclose(f);
                return NULL;
            }
            m[n].fd = fds[layer];
            m[n].off = strtoull(b, NULL, 0);
        }
        n++;
    }
    fclose(f);
    if (!m || n == 0) {
        fprintf(stderr, "raw-read: %s: no clusters\n", path);
        free(m);
        return NULL;
    }
    *nclusters = n;
    return m;
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: raw-read COUNT SIZE MAP FILE...\n");
        return 2;
    }
    uint64_t count = strtoull(argv[1], NULL, 0), size = strtoull(argv[2], NULL, 0);
    if (size == 0 || size > CLUSTER || CLUSTER % size) {
        fprintf(stderr, "raw-read: SIZE must divide %u\n", CLUSTER);
        return 2;
    }
    int nfiles = argc - 4;
    int *fds = calloc((size_t)nfiles, sizeof(*fds));
    if (!fds) {
        return 1;
    }
    for (int i = 0; i < nfiles; i++) {
        fds[i] = open(argv[4 + i], O_RDONLY);
        if (fds[i] < 0) {
            perror(argv[4 + i]);
            return 1;
        }
    }
    uint64_t nclusters = 0;
    struct where *map = load_map(argv[3], fds, nfiles, &nclusters);
    uint8_t *buf = aligned_alloc(4096, CLUSTER);
    if (!map || !buf) {
        return 1;
    }
    uint64_t disk = nclusters * CLUSTER;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    uint64_t off = 0;
    for (uint64_t i = 0; i < count; i++) {
        if (off + size > disk) {
            off = 0;
        }
        const struct where *w = &map[off / CLUSTER];
        if (w->fd < 0) {
            memset(buf, 0, size);
        } else if (pread(w->fd, buf, size, (off_t)(w->off + off % CLUSTER)) != (ssize_t)size) {
            fprintf(stderr, "raw-read: short read at disk offset %" PRIu64 "\n", off);
            return 1;
        }
        off += size;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("Run completed in %3.3f seconds.\n", secs);
    return 0;
}
