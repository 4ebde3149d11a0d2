/* TVM's CPU thread pool as its generated code calls it (the runtime's C ABI, TVMParallelGroupEnv and
 * TVMBackendParallelLaunch), for the hand-written benchmark kernels in tools/: they link libtvm_runtime.so and
 * run their tasks on the same workers as the kernels timed beside them. num_task 0 = every worker. */
#ifndef TVM_PAGED_TOOLS_TVM_THREAD_POOL_H_
#define TVM_PAGED_TOOLS_TVM_THREAD_POOL_H_

typedef struct {
  void *sync_handle;
  int num_task;
} ParallelEnv;
extern int TVMBackendParallelLaunch(int (*f)(int, ParallelEnv *, void *), void *cdata, int num_task);

#endif
