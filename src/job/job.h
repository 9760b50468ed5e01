/* The job API is public: see include/cowtree/job.h. */
#include "cowtree/job.h"
