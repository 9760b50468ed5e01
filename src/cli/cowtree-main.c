/* cowtree: the snapshot manager's command-line tool (virsh-like verbs). */
#include <stdio.h>
#include <string.h>

#include "cowtree/cowtree.h"

int main(int argc, char **argv)
{
    if (argc > 1 && (strcmp(argv[1], "--version") == 0)) {
        printf("cowtree version %s\n", CT_VERSION_STRING);
        return 0;
    }
    fprintf(stderr, "cowtree: the snapshot manager is being built (issue 5)\n");
    return 1;
}
