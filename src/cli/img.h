/* cowtree-img subcommands (one file each where they are large). */
#ifndef CT_CLI_IMG_H
#define CT_CLI_IMG_H

#include "cowtree/cowtree.h"

int img_info(int argc, char **argv);
int img_check(int argc, char **argv);
int img_bench(int argc, char **argv);
int img_snapshot(int argc, char **argv);
int img_diff(int argc, char **argv);
int img_split(int argc, char **argv);
int img_compact(int argc, char **argv);

#include <json-c/json.h>
void img_print_snapshots_human(struct ct_image *img);
json_object *img_snapshots_json(struct ct_image *img);

/* Open with the tool's conventions (reports errors itself). NULL on failure. */
struct ct_image *img_open(const char *path, const char *fmt, unsigned flags);

#endif
